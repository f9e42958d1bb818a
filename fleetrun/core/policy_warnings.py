"""Warnings about allow rules that let through more than they seem to.

A rule allows one program and the arguments its pattern matches; what the program then does
with them is the program's business. Some programs run commands or code that arrive in their
arguments (``awk 'BEGIN { system("rm -rf ~") }'``, ``tar --checkpoint-action=exec=CMD``), so
``allow: awk *`` allows every command. Such a rule is kept (its author may mean it), and
named in a warning that says why and what to write instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetrun.core.shell import SH_FAMILY

if TYPE_CHECKING:
    from fleetrun.core.policy import Rule

_INTERPRETERS = ("perl", "python", "python2", "python3", "ruby", "node", "nodejs", "php", "lua", "tclsh", "expect",
                 "Rscript", "julia", "pwsh", "deno", "bun")
#: Programs that run the command they are given, with a narrower rule for each.
_RUN_WHAT_THEY_ARE_GIVEN = {
    "strace": "strace -c uptime", "ltrace": "ltrace -c uptime", "valgrind": "valgrind /opt/tools/check",
    "gdb": "gdb -batch -ex bt -p 1234", "watch": "watch -n 5 uptime", "taskset": "taskset -p 1234",
    "chrt": "chrt -p 1234", "flock": "flock /run/app.lock uptime", "unshare": "unshare -n uptime",
    "nsenter": "nsenter -t 1234 -n ip addr", "chroot": "chroot /srv/jail /bin/true", "runuser": "runuser -u app -- uptime",
    "su": "su app -c uptime", "script": "script -q -c uptime /dev/null", "systemd-run": "systemd-run --user uptime",
    "setpriv": "setpriv --reuid app uptime", "numactl": "numactl --hardware", "firejail": "firejail --list",
}
_SHELLS = sorted(SH_FAMILY | {"fish", "csh", "tcsh"})

#: Programs that run commands or code given in their arguments: what they run, and an
#: example of a narrower rule.
RUNS_COMMANDS: dict[str, tuple[str, str]] = {
    **{name: ("commands through system() and pipes in its program", f"{name} -F: '{{print $1}}' /etc/passwd")
       for name in ("awk", "gawk", "mawk", "nawk")},
    **{name: ("the code its arguments hold (-e, -c, a script)", f"{name} /opt/tools/report") for name in _INTERPRETERS},
    **{name: ("the command it is given", narrower) for name, narrower in _RUN_WHAT_THEY_ARE_GIVEN.items()},
    **{name: ("the script files it is given, which no rule sees", f"{name} /opt/tools/check.sh") for name in _SHELLS},
    "busybox": ("any of its applets, sh among them", "busybox uptime"),
    "sed": ("commands with its e command, and writes files with w", "sed -n '1,20p' /var/log/syslog"),
    **{name: ("commands (:!CMD, -c)", f"{name} -R /etc/hosts") for name in ("vi", "vim", "nvim", "ex", "view")},
    "git": ("commands through -c core.pager=…, aliases (!CMD) and hooks", "git status *"),
    "tar": ("commands (--to-command, --checkpoint-action=exec=…)", "tar -tzf /backups/*.tar.gz"),
    "zip": ("commands (-TT)", "zip -r /tmp/logs.zip /var/log/app"),
    "rsync": ("a command as its remote shell (-e)", "rsync -a /srv/www/ /backups/www/"),
    "ssh": ("commands on other hosts, and here through -o ProxyCommand=…", "ssh db1 uptime"),
    "scp": ("a command in place of ssh (-S)", "scp db1:/var/log/app.log /tmp/"),
    "make": ("the commands of whatever makefile it finds, and --eval", "make -C /srv/app test"),
    **{name: ("commands (EXEC:, -e)", f"{name} -z db1 5432") for name in ("socat", "nc", "ncat", "netcat")},
    **{name: ("commands in containers (exec, run)", f"{name} ps") for name in ("docker", "podman", "kubectl", "crictl")},
    **{name: ("commands later, on a schedule", f"{name} -l") for name in ("crontab", "at", "batch")},
    **{name: ("commands through -o APT::Update::Pre-Invoke::=…", f"{name} update") for name in ("apt", "apt-get")},
    "dpkg": ("the scripts of the packages it installs", "dpkg -l"),
    **{name: ("the build code of the packages it installs", f"{name} list") for name in ("pip", "pip3")},
    "npm": ("the scripts of packages and of package.json", "npm ls"),
}
#: Of those, the ones whose first argument is a subcommand: only a wildcard there, or one of
#: these subcommands, lets commands through (`git status *` does not).
_SUBCOMMANDS_THAT_RUN = {"git": (), "docker": ("exec", "run"), "podman": ("exec", "run"), "kubectl": ("exec", "run", "debug"),
                         "crictl": ("exec", "run")}


def _could_match_an_option(word: str) -> bool:
    """Whether a pattern word matches some option or code: `*`, `-*`, `?x`; `/backups/*.tar.gz` cannot."""
    return any(char in word for char in "*?[") and word[:1] in "*?[-"


def rule_warning(rule: Rule) -> str | None:
    """Why ``rule`` allows any command, or None."""
    if rule.action != "allow" or rule.pattern is None:
        return None
    words = rule.words
    program = words[0].rsplit("/", 1)[-1]
    found = RUNS_COMMANDS.get(program)
    if found is None or len(words) < 2:
        return None
    if program in _SUBCOMMANDS_THAT_RUN:
        opens = _could_match_an_option(words[1]) or words[1] in _SUBCOMMANDS_THAT_RUN[program]
    else:
        opens = any(_could_match_an_option(word) for word in words[1:])
    if not opens:
        return None
    runs, narrower = found
    return (f"{rule.describe()}: {program} runs {runs}, so this rule lets any command through; "
            f"allow the forms you mean instead, such as '{narrower}'")
