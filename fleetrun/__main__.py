from fleetrun.cli import main

raise SystemExit(main())
