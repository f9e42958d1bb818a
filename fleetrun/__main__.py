from fleetrun.cli import entry

entry()
