"""The one entry point of every command: `--config` (an ml_collections file; the command's own
by default), `--workdir`, multi-host flags, `--import_modules`, then `run(config, workdir)`.

    saejax COMMAND --workdir=DIR [--config=NAME[:small] | --config=path/to/file.py[:ARG]]
        [--config.KEY=VALUE ...] [--import_modules=my_saes] [--distributed | --coordinator_address=HOST:PORT
        --num_processes=N --process_id=I] [--peer_timeout_s=180]

`--config` takes a file, or the name of a config shipped in `saejax.configs` (`clip_vit_b16`,
`clip_vit_b16:small`; `saejax --help` lists them), or `:ARG` alone for the command's own config
with that argument (`saejax demo --config=:small`). From a checkout, `python -m
experiments.COMMAND` runs the same code, and paths to the old `experiments/configs/FILE.py`
still resolve to the shipped file.

An error ends the command with its traceback and then one line, `NAME failed: Error: message`,
on stderr (exit code 1); SIGTERM / SIGINT during training saves a checkpoint and exits with
128 + the signal (`saejax.loop.Preempted`). In a multi-host run, a process that dies, stops or
hangs ends every other within about `--peer_timeout_s` seconds with one line naming it and exit
code 75 (`saejax.run.peers`); rerun the same command on every host to resume.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Callable

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> list[str]:
    """The names of the configs shipped in `saejax.configs` (`paper` is a shared helper, not one)."""
    return sorted(name.removesuffix(".py") for name in os.listdir(CONFIGS)
                  if name.endswith(".py") and not name.startswith("_") and name != "paper.py")


def resolve_config(value: str, default_file: str) -> str:
    """`--config`'s value with its file made a real path: an existing file stays as given; a
    shipped config's name (`clip_vit_b16`, `clip_vit_b16.py`, or an old
    `experiments/configs/clip_vit_b16.py` path) becomes its file in `saejax.configs`; an empty
    path is the command's own config (`default_file`). The `:ARG` part is kept.

    Raises:
        ValueError: naming the value and the shipped configs, when it is neither.
    """
    path, colon, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    folder, name = os.path.split(path)
    name = (name or default_file).removesuffix(".py")
    # Only a bare name or the old checkout path: a missing file elsewhere is the user's typo.
    if (folder and os.path.normpath(folder).split(os.sep)[-2:] != ["experiments", "configs"]) \
            or name not in shipped_configs():
        raise ValueError(f"--config={value}: {path!r} is neither a file nor a config shipped with saejax "
                         f"({', '.join(shipped_configs())})")
    return os.path.join(CONFIGS, name + ".py") + colon + arg


def _with_resolved_config(argv: Sequence[str], default_file: str) -> list[str]:
    """`argv` with each `--config=VALUE` / `--config VALUE` resolved (`resolve_config`)."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if word.startswith("--config="):
            argv[i] = "--config=" + resolve_config(word.removeprefix("--config="), default_file)
        elif word == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1], default_file)
    return argv


def run_binary(name: str, run: Callable[[Any, str], Any], config_file: str, *, argv: Sequence[str] | None = None,
               workdir_help: str = "Where the results go.") -> None:
    """Define the flags and run `run(config, workdir)` under absl.

    Args:
        name: the command's name in its error line (`NAME failed: ...`).
        run: `run(config, workdir)`, the command's work; a `run` that takes `step_hooks`
            (training) gets `(PeerWatchdog.progress,)`, how the multi-host watchdog sees steps.
        config_file: its default config, a file in `saejax.configs`.
        argv: the program name and arguments (default `sys.argv`).
        workdir_help: `--workdir`'s help text.

    Flags are defined here, when the command starts, so tests can import several commands in
    one process.
    """
    from absl import app, flags, logging  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, config_file),
                                    f"An ml_collections config file or the name of one shipped with saejax (default "
                                    f"{config_file.removesuffix('.py')}; :small alone for its small variant; shipped: "
                                    f"{', '.join(shipped_configs())}).", lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_list("import_modules", [], "Python modules to import first, e.g. one that registers an SAE "
                      "architecture (`saejax.sae.register`) named in the config.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (peers found automatically on Cloud "
                      "TPU, SLURM, ...).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.DEFINE_float("peer_timeout_s", 180.0, "Multi-host: seconds after which a process that stopped answering "
                       "(dead, stopped, or stuck behind the others) ends the run on every host.", lower_bound=1.0)

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
        FLAGS = flags.FLAGS
        if FLAGS.workdir is None:
            raise app.UsageError("--workdir is required")
        distributed = FLAGS.coordinator_address is not None or FLAGS.distributed
        if distributed:  # before anything touches the devices
            import jax  # noqa: PLC0415

            # JAX's own heartbeat (a C++ abort) is the backstop behind the watchdog's clean exit; a
            # process that never joins ends the others' wait here after the same timeout.
            try:
                jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                           initialization_timeout=int(FLAGS.peer_timeout_s) + 1,
                                           heartbeat_timeout_seconds=int(2 * FLAGS.peer_timeout_s) + 10)
            except Exception as e:  # noqa: BLE001 - JAX's message names the tasks it waited for
                message = " ".join(str(e).split())[:1000]
                print(f"\n{name} failed: a process did not join within --peer_timeout_s={FLAGS.peer_timeout_s:g} "
                      f"s (jax.distributed.initialize: {message}); start every process, then rerun",
                      file=sys.stderr, flush=True)
                from saejax.run.peers import PEER_LOST_EXIT  # noqa: PLC0415

                os._exit(PEER_LOST_EXIT)
        for module in FLAGS.import_modules:
            importlib.import_module(module)
        from saejax.run.loop import Preempted  # noqa: PLC0415
        from saejax.run.peers import PEER_LOST_EXIT, PeerWatchdog  # noqa: PLC0415

        with PeerWatchdog(FLAGS.peer_timeout_s) as watchdog:
            # A command that trains takes the watchdog's progress as a step hook of its loop.
            progress = {"step_hooks": (watchdog.progress,)} if "step_hooks" in inspect.signature(run).parameters else {}
            try:
                run(FLAGS.config, os.path.expanduser(FLAGS.workdir), **progress)
                if distributed:  # its barrier under the watchdog: a peer lost at the very end is named too
                    jax.distributed.shutdown()
            except Preempted as e:
                print(f"\n{e}: saved a checkpoint; rerun the same command to resume.", flush=True)
                raise SystemExit(128 + e.signum) from None
            except Exception as e:  # noqa: BLE001 - the traceback, then the first error in one line at the end
                traceback.print_exc()
                notes = "; ".join(n for n in getattr(e, "__notes__", []) if n.startswith("saejax:"))
                line = " ".join(f"{type(e).__name__}: {e}{' (' + notes + ')' if notes else ''}".split())
                print(f"\n{name} failed: {line}", file=sys.stderr, flush=True)
                if distributed:
                    # A collective that fails because a peer died: name it. Then leave without JAX's
                    # shutdown barrier, which would wait for the peers in vain and abort.
                    lost = watchdog.lost_peer()
                    if lost:
                        print(f"\n{lost}", file=sys.stderr, flush=True)
                    os._exit(PEER_LOST_EXIT if lost else 1)
                raise SystemExit(1) from None

    argv = list(sys.argv if argv is None else argv)
    if any(word in ("-h", "--help", "--helpshort") for word in argv[1:]):
        # absl's own --help prints __main__'s docstring, which is the console script's wrapper.
        module = sys.modules[run.__module__]
        helps = [flags.FLAGS.module_help(m) for m in (__name__, run.__module__, config_flags.__name__)]
        help_text = "".join(text + "\n" for text in helps if text)
        print(f"usage: {argv[0]} --workdir=DIR [--config=NAME[:ARG] | --config=FILE.py[:ARG]] [--config.KEY=VALUE ...] "
              f"[flags]\n\n{module.__doc__.strip()}\n\nflags:\n{help_text}\nAll flags: --helpfull.")
        raise SystemExit(0)
    try:
        argv = _with_resolved_config(argv, config_file)
    except ValueError as e:
        print(f"{name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    app.run(main, argv=argv)
