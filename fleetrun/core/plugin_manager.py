"""The typed facade over pluggy: the core calls these methods, never ``pm.hook``.

One manager per executor, built on demand (nothing is loaded at import time):
built-in plugins are registered explicitly, third-party ones come from the
``fleetrun`` entry-point group, then ``check_pending()`` rejects hooks that do not exist.

Environment:

* ``FLEETRUN_DISABLE_PLUGINS=name,other`` blocks plugins by name (built-in or not);
* ``FLEETRUN_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry-point plugins;
* ``FLEETRUN_TRACE=1`` logs every hook call to the ``fleetrun.trace`` logger.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import pluggy

from fleetrun.core import hookspecs
from fleetrun.core.errors import PluginError
from fleetrun.core.models import Progress, Task, TaskResult
from fleetrun.core.transport import Transport

if TYPE_CHECKING:
    from fleetrun.core.policy import Decision

ENTRY_POINT_GROUP = "fleetrun"
DISABLE_ENV = "FLEETRUN_DISABLE_PLUGINS"
NO_AUTOLOAD_ENV = "FLEETRUN_DISABLE_PLUGIN_AUTOLOAD"
TRACE_ENV = "FLEETRUN_TRACE"

#: Built-in plugins: (registered name, module). Registered explicitly, in this order.
BUILTIN_PLUGINS = (
    ("fleetrun.transports.local", "fleetrun.plugins.transports.local"),
    ("fleetrun.transports.ssh", "fleetrun.plugins.transports.ssh"),
)

#: Where a plugin came from, besides a distribution's name and version (an entry point).
BUILT_IN = "built-in"
BY_CODE = "registered by code"

log = logging.getLogger("fleetrun.plugins")

#: A lifecycle hook that runs this long holds up every task of its executor: its plugin is
#: named in a warning (once), since nothing else shows where the time went.
SLOW_HOOK_SECONDS = 0.25


@dataclass(frozen=True)
class PluginInfo:
    """What ``fleetrun plugins`` shows about one plugin."""

    name: str
    source: str
    hooks: tuple[str, ...] = ()
    error: str | None = None
    #: Named in ``$FLEETRUN_DISABLE_PLUGINS``; ``source`` says what it matched, if anything.
    blocked: bool = False


@dataclass
class _FailedPlugin:
    name: str
    source: str
    error: str


@dataclass
class _Notifier:
    """A per-plugin hook caller, so one plugin's exception cannot skip the others."""

    plugin_name: str
    call: Callable[..., Any]


class PluginManager:
    """fleetrun's plugins and the typed calls the executor makes into them."""

    def __init__(
        self,
        *,
        plugins: Iterable[object] = (),
        autoload: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}
        self._failed: list[_FailedPlugin] = []
        self._notifiers: dict[str, list[_Notifier]] | None = None
        self._transports: dict[str, type[Transport]] | None = None
        self._tracing = False
        self._named_slow: set[str] = set()
        #: Blocked name -> what it kept out ("" until something by that name is found).
        self._blocked: dict[str, str] = {}
        for name in filter(None, (n.strip() for n in env.get(DISABLE_ENV, "").split(","))):
            self._pm.set_blocked(name)
            self._blocked[name] = ""
        if env.get(TRACE_ENV, "") not in ("", "0", "false", "no"):
            self._enable_tracing()
        for name, module in BUILTIN_PLUGINS:
            if self._pm.is_blocked(name):
                self._blocked[name] = BUILT_IN
            else:
                self._register(importlib.import_module(module), name, BUILT_IN)
        if autoload is None:
            autoload = env.get(NO_AUTOLOAD_ENV, "") in ("", "0", "false", "no")
        if autoload:
            self._load_entry_points()
        for plugin in plugins:
            self.register(plugin)
        self._check_pending()

    # -- registration ----------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin (an object or module with hook implementations); returns its name.

        Raises :class:`PluginError`, and keeps nothing of the plugin, when it does not fit
        fleetrun's hooks.
        """
        registered = self._register(plugin, name, BY_CODE)
        try:
            self._check_pending()
        except PluginError:
            self._forget(registered)
            raise
        return registered

    def get(self, name: str) -> object | None:
        """The plugin registered as ``name`` (``fleetrun plugins`` lists the names), or None."""
        return self._pm.get_plugin(name)

    def unregister(self, plugin: object) -> None:
        self._pm.unregister(plugin)
        self._notifiers = None
        self._transports = None

    def _forget(self, name: str) -> None:
        if self._pm.get_plugin(name) is not None:
            self._pm.unregister(name=name)
        self._sources.pop(name, None)
        self._notifiers = None
        self._transports = None

    def _register(self, plugin: object, name: str | None, source: str) -> str:
        if name is None:
            name = self._readable_name(plugin)
        if isinstance(plugin, type):
            # pluggy would take it, and every hook call would then fail for want of `self`.
            raise _misfit(
                name, f"it is the class {_class_path(plugin)}, whose hooks would have no `self`: use an instance of it, or a module"
            )
        try:
            registered = self._pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}", problem=str(exc)) from None
        except pluggy.PluginValidationError as exc:
            self._forget(name)  # pluggy keeps what it registered before the hook it refused
            raise _misfit(name, _validation_problem(exc)) from None
        if registered is None:  # blocked
            if name in self._blocked and not self._blocked[name]:
                self._blocked[name] = source
            return name or ""
        self._sources[registered] = source
        self._notifiers = None
        self._transports = None
        return registered

    def _readable_name(self, plugin: object) -> str:
        """A name for log lines and `fleetrun plugins`: the module, or module.Class."""
        if isinstance(plugin, type(logging)):
            base = plugin.__name__
        elif isinstance(plugin, type):
            base = _class_path(plugin)
        else:
            base = _class_path(type(plugin))
        name, count = base, 1
        while self._pm.has_plugin(name):
            count += 1
            name = f"{base}#{count}"
        return name

    def _load_entry_points(self) -> None:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or self._pm.get_plugin(ep.name):
                    continue
                source = f"{dist.metadata['Name']} {dist.version}"
                if self._pm.is_blocked(ep.name):
                    self._blocked[ep.name] = source
                    continue
                # A broken or misfitting installed plugin must not stop fleetrun: the
                # commands that would show what is wrong (`fleetrun plugins`) need it to run.
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self._leave_out(ep.name, source, f"{type(exc).__name__}: {exc}")
                    continue
                try:
                    self._register(plugin, ep.name, source)
                    self._check_pending()
                except PluginError as exc:
                    self._forget(ep.name)
                    self._leave_out(ep.name, source, exc.problem)

    def _leave_out(self, name: str, source: str, problem: str) -> None:
        log.warning(
            "plugin %r (%s) failed to load: %s; fleetrun goes on without it (%s=%s stops loading it)",
            name, source, problem, DISABLE_ENV, name,
        )
        self._failed.append(_FailedPlugin(name, source, problem))

    def _check_pending(self) -> None:
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self._pm.get_name(exc.plugin) or repr(exc.plugin)
            raise _misfit(name, self._unknown_hooks(exc.plugin)) from None

    def _unknown_hooks(self, plugin: object) -> str:
        known = [name for name in vars(hookspecs) if name.startswith(f"{hookspecs.PROJECT_NAME}_")]
        problems = []
        for caller in self._pm.get_hookcallers(plugin) or []:
            if caller.has_spec() or all(i.optionalhook for i in caller.get_hookimpls() if i.plugin is plugin):
                continue
            guess = difflib.get_close_matches(caller.name, known, n=1)
            problems.append(
                f"it implements {caller.name!r}, which is not a fleetrun hook"
                + (f" (did you mean {guess[0]!r}?)" if guess else "")
            )
        return "; ".join(sorted(problems))

    def _enable_tracing(self) -> None:
        trace_log = logging.getLogger("fleetrun.trace")
        self._pm.trace.root.setwriter(lambda text: trace_log.info(text.rstrip("\n")))
        self._pm.enable_tracing()
        self._tracing = True

    # -- introspection ---------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with the hooks it implements, then those that failed, then
        the names ``$FLEETRUN_DISABLE_PLUGINS`` blocks (a misspelt one matches nothing)."""
        self.transports  # an installed plugin can fail here too, and is listed as failed then
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:
                continue
            callers = self._pm.get_hookcallers(plugin) or []
            infos.append(
                PluginInfo(name=name, source=self._sources.get(name, "?"), hooks=tuple(sorted(c.name for c in callers)))
            )
        infos.extend(PluginInfo(name=f.name, source=f.source, error=f.error) for f in self._failed)
        infos.extend(
            PluginInfo(name=name, source=source or "matched no plugin", blocked=True)
            for name, source in self._blocked.items()
        )
        return infos

    @property
    def transports(self) -> Mapping[str, type[Transport]]:
        """Transport classes by name, collected through ``fleetrun_register_transports``.

        Each plugin is asked in turn, built-in ones first, so an installed plugin cannot take
        a built-in transport's name. An installed plugin whose registration goes wrong is
        left out, as if it had failed to load; any other raises :class:`PluginError`.
        """
        if self._transports is None:
            collected: dict[str, type[Transport]] = {}
            impls = self._pm.hook.fleetrun_register_transports.get_hookimpls()
            for impl in impls:
                try:
                    mine = self._transports_of(impl, impls, collected)
                except PluginError as exc:
                    source = self._sources[impl.plugin_name]
                    if source in (BUILT_IN, BY_CODE):
                        raise
                    self._forget(impl.plugin_name)
                    self._leave_out(impl.plugin_name, source, exc.problem)
                    continue
                collected.update(mine)
            self._transports = collected
        return self._transports

    def _transports_of(
        self, impl: pluggy.HookImpl, impls: list[pluggy.HookImpl], taken: Mapping[str, type[Transport]]
    ) -> dict[str, type[Transport]]:
        """What one plugin registers, by name; raises :class:`PluginError` for anything amiss."""
        hook_name = "fleetrun_register_transports"
        offered: list[type[Transport]] = []
        try:
            self._caller_of_one(hook_name, impl, impls)(register=offered.append)
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}",
                problem=f"{hook_name} raised {type(exc).__name__}: {exc}",
            ) from exc
        return _transport_names(impl.plugin_name, offered, taken)

    # -- lifecycle notifications -----------------------------------------------------

    def task_created(self, task: Task) -> None:
        self._notify("fleetrun_task_created", task=task)

    def task_progress(self, task: Task, progress: Progress) -> None:
        self._notify("fleetrun_task_progress", task=task, progress=progress)

    def task_completed(self, task: Task, result: TaskResult) -> None:
        self._notify("fleetrun_task_completed", task=task, result=result)

    def task_cancelled(self, task: Task, reason: str) -> None:
        self._notify("fleetrun_task_cancelled", task=task, reason=reason)

    def command_denied(self, host: str, command: str, decision: Decision, origin: str | None) -> None:
        self._notify("fleetrun_command_denied", host=host, command=command, decision=decision, origin=origin)

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        for notifier in self._notifiers_for(hook_name):
            started = time.monotonic()
            try:
                notifier.call(**kwargs)
            except Exception:
                log.exception("plugin %r failed in %s; the task and other plugins go on", notifier.plugin_name, hook_name)
            took = time.monotonic() - started
            if took >= SLOW_HOOK_SECONDS and notifier.plugin_name not in self._named_slow:
                self._named_slow.add(notifier.plugin_name)
                log.warning(
                    "plugin %r took %.2f s in %s: hooks run on the executor's engine thread, and every task waits "
                    "for them; a hook should hand slow work to a thread of its own", notifier.plugin_name, took, hook_name,
                )

    def _notifiers_for(self, hook_name: str) -> list[_Notifier]:
        if self._notifiers is None:
            self._notifiers = {name: self._build_notifiers(name) for name in hookspecs.NOTIFY_HOOKS}
        return self._notifiers[hook_name]

    def _build_notifiers(self, hook_name: str) -> list[_Notifier]:
        caller = getattr(self._pm.hook, hook_name)
        # pluggy calls implementations last-registered first (tryfirst/trylast respected);
        # keep that order, but give each plugin a caller of its own.
        impls = list(reversed(caller.get_hookimpls()))
        if not self._tracing and not any(impl.wrapper or impl.hookwrapper for impl in impls):
            # Plain implementations: call each the way pluggy would, without its per-call
            # machinery, which would cost more than a short task's own bookkeeping.
            return [_Notifier(impl.plugin_name, _direct_call(impl)) for impl in impls]
        return [_Notifier(impl.plugin_name, self._caller_of_one(hook_name, impl, impls)) for impl in impls]

    def _caller_of_one(self, hook_name: str, impl: pluggy.HookImpl, impls: list[pluggy.HookImpl]) -> Callable[..., Any]:
        """A caller of ``impl``'s plugin alone, wrappers and tracing respected."""
        return self._pm.subset_hook_caller(hook_name, [other.plugin for other in impls if other.plugin is not impl.plugin])


def _transport_names(
    plugin_name: str, offered: list[type[Transport]], taken: Mapping[str, type[Transport]]
) -> dict[str, type[Transport]]:
    """What one plugin registered, by name; raises :class:`PluginError` for anything amiss."""
    mine: dict[str, type[Transport]] = {}
    for cls in offered:
        if not (isinstance(cls, type) and issubclass(cls, Transport)):
            problem = f"register() takes a Transport subclass, got {cls!r}"
        elif not isinstance(getattr(cls, "name", None), str) or not cls.name:
            problem = f"transport class {cls.__qualname__} has no name"
        elif (other := mine.get(cls.name) or taken.get(cls.name)) not in (None, cls):
            problem = f"two transports are named {cls.name!r}: {_class_path(other)} and {_class_path(cls)}"
        else:
            mine[cls.name] = cls
            continue
        raise PluginError(f"plugin {plugin_name!r}: {problem}", problem=problem)
    return mine


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _misfit(name: str, problem: str) -> PluginError:
    return PluginError(f"plugin {name!r} does not fit fleetrun's hooks: {problem}", problem=problem)


def _validation_problem(exc: pluggy.PluginValidationError) -> str:
    """pluggy's reason on one line, without its first line (which names the plugin)."""
    lines = str(exc).splitlines()
    return "; ".join(lines[1:] if len(lines) > 1 and lines[0].startswith("Plugin ") else lines)


def _direct_call(impl: pluggy.HookImpl) -> Callable[..., Any]:
    function, names = impl.function, impl.argnames

    def call(**kwargs: Any) -> Any:
        # An implementation may take fewer arguments than the spec offers, as pluggy allows.
        return function(*[kwargs[name] for name in names])

    return call
