"""The one entry point of every binary: `--config` (an ml_collections file; the binary's own
by default, `:small` for its small variant), `--workdir`, multi-host flags, `--import_modules`,
then `run(config, workdir)`.

    python -m experiments.BINARY --workdir=DIR [--config=experiments/configs/FILE.py[:small]]
        [--config.KEY=VALUE ...] [--import_modules=my_saes] [--distributed | --coordinator_address=HOST:PORT
        --num_processes=N --process_id=I] [--peer_timeout_s=180]

An error ends the binary with its traceback and then one line, `BINARY failed: Error: message`,
on stderr (exit code 1); SIGTERM / SIGINT during training saves a checkpoint and exits with
128 + the signal (`saejax.loop.Preempted`). In a multi-host run, a process that dies, stops or
hangs ends every other within about `--peer_timeout_s` seconds with one line naming it and exit
code 75 (`saejax.run.peers`); rerun the same command on every host to resume.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any, Callable

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def run_binary(name: str, run: Callable[[Any, str], Any], config_file: str, *,
               workdir_help: str = "Where the results go.") -> None:
    """Define the flags and run `run(config, workdir)` under absl (`config_file`: a file in
    `experiments/configs/`). Flags are defined here, when the binary starts, so tests can
    import several binaries in one process."""
    from absl import app, flags, logging  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, config_file),
                                    f"An ml_collections config file (default experiments/configs/{config_file}; "
                                    f"append :small for the small variant).", lock_config=True)
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
                from saejax.run.peers import PEER_LOST_EXIT  # noqa: PLC0415 - after initialize, like every saejax import

                os._exit(PEER_LOST_EXIT)
        for module in FLAGS.import_modules:
            importlib.import_module(module)
        from saejax.run.loop import Preempted  # noqa: PLC0415
        from saejax.run.peers import PEER_LOST_EXIT, PeerWatchdog  # noqa: PLC0415

        with PeerWatchdog(FLAGS.peer_timeout_s) as watchdog:
            try:
                run(FLAGS.config, os.path.expanduser(FLAGS.workdir))
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

    app.run(main)
