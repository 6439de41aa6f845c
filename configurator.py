"""
nanoGPT's configurator, the one configuration path of every script (train, eval, predict, viz, ablate,
bench): positional arguments are Python config files run against the defaults, --key=value overrides
them, each value parsed as a Python literal and checked against its default's type. configure_run adds
the SIM preset, for a run's settings (config.py's defaults).

    python train.py configs/coco_sim_r50_1x.py --lr=5e-4 --resume
"""

import ast
import os

import sim


class _Recorder(dict):
    """The namespace a config file runs in: remembers every name the file assigns."""

    def __init__(self, *args):
        super().__init__(*args)
        self.assigned = set()

    def __setitem__(self, key, value):
        self.assigned.add(key)
        super().__setitem__(key, value)


def parse_value(key, val, default, prog):
    """'--key=val' -> a value of default's type: a Python literal, else the plain string; an int where a
    float is expected becomes a float, a scalar where a tuple is expected a 1-tuple; bare --key is True."""
    if val == "" and isinstance(default, bool):
        return True
    try:
        val = ast.literal_eval(val)
    except (SyntaxError, ValueError):
        pass  # a plain string
    if isinstance(default, tuple) and isinstance(val, (int, float)):
        val = (val,)
    if isinstance(default, float) and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if default is not None and type(val) is not type(default):
        raise SystemExit(f"{prog}: --{key}={val!r} should be a {type(default).__name__} like the default {default!r}")
    return val


class Explicit(set):
    """The keys a run set explicitly (config files and the command line); .command_line: those named on
    the command line alone (a SIM preset yields to these, not to a config file's values: sim.apply_preset)."""

    def __init__(self):
        super().__init__()
        self.command_line = set()


def configure(argv, config, prog="train.py"):
    """Apply config files and --key=value overrides to `config` in place -> the keys set explicitly
    (an Explicit set). A bad argument stops with one line naming it and the fix."""
    explicit = Explicit()
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"{prog}: config file {arg} not found — fix: pass a path such as "
                                 f"configs/coco_boxinst_r50_1x.py, or --key=value")
            ns = _Recorder(config)
            exec(open(arg).read(), {}, ns)
            explicit |= ns.assigned
            config.update({k: v for k, v in ns.items() if k in config})
            continue
        key, _, val = arg[2:].partition("=")
        if key not in config:
            names = ", ".join("--" + k for k in config) if len(config) <= 20 else "the names in config.py"
            raise SystemExit(f"{prog}: unknown option --{key} — fix: use one of {names}")
        config[key] = parse_value(key, val, config[key], prog)
        explicit.add(key)
        explicit.command_line.add(key)
    return explicit


def configure_run(argv, cfg, prog="train.py"):
    """configure, then the SIM preset of cfg["sim_variant"] fills the knobs nobody set explicitly
    (sim.apply_preset) -> what the preset set. The path of a run's settings (config.defaults()): train.py's,
    and that of every script that steps or checks as train.py would (bench.py, ablate.py)."""
    return sim.apply_preset(cfg, configure(argv, cfg, prog))
