"""Extensions from outside sensq, imported before the CLI builds its choices and help.

A plugin is a module that registers what it adds when imported: a number format (``register_format``), a
calibration method or weight step (``register_calibration``, ``register_weight_step``), a kind of protected set
(``register_set_builder``), an export target (``register_target``), a plan exporter (``register_exporter``) or a
model family (``register_family``); docs/extending.md has one worked example of each. Two ways to load one:

* an installed package's entry point in the group ``sensq.plugins`` (``setup.cfg``:
  ``[options.entry_points] sensq.plugins = mine = my_package.sensq_extension``);
* ``SENSQ_PLUGINS=module.one,module.two`` in the environment (a module on the Python path).

Library users import their plugin modules themselves.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from sensq.errors import InputError

GROUP = "sensq.plugins"
ENV = "SENSQ_PLUGINS"


def plugin_modules() -> list[str]:
    """The modules to load: entry points of :data:`GROUP`, then :data:`ENV`'s comma-separated names."""
    named = [point.value.split(":")[0] for point in entry_points(group=GROUP)]
    return named + [name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()]


def load_plugins() -> list[str]:
    """Import every plugin module; returns their names.

    Raises:
        InputError: a module that cannot be imported, or raises while registering (named, with its error's first
            line).
    """
    loaded = []
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any failure of someone else's module is reported as one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"sensq plugin {name!r} failed to load: {first} (from {ENV} or the {GROUP!r} entry "
                             "points)") from None
        loaded.append(name)
    return loaded
