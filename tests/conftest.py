import os

import jax
import pytest

from saejax.datasets import synthetic


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has made its factory
def pytest_configure(config):
    """One persistent XLA compilation cache per test run, under the run's temporary folder: the
    xdist workers and every binary a test starts (they inherit the environment) compile each
    tiny model once instead of once per process. It halves a small training binary's time."""
    run_folder = config._tmp_path_factory.getbasetemp()
    if hasattr(config, "workerinput"):  # an xdist worker's folder is inside the run's
        run_folder = run_folder.parent
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(run_folder / "jax-compilation-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def sparse_data(key, n, d_model=16, n_features=48, p_fire=0.06, noise=0.01):
    """`(inputs [n, d_model], planted features)`: what an SAE should recover."""
    world_key, sample_key = jax.random.split(key)
    world = synthetic.make_world(world_key, d_model=d_model, n_features=n_features, mean_active=p_fire * n_features,
                                 noise=noise)
    return world.sample(sample_key, n), world.features


def chromium_path() -> str:
    """The Chromium the browser tests drive: the system's (Debian's `chromium`, or Chrome), else
    Playwright's own, which is installed (`python -m playwright install chromium`) on first use.
    Neither: a failure that says what to install, not a skip."""
    import shutil
    import subprocess
    import sys
    import tempfile

    import filelock
    from playwright.sync_api import sync_playwright

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    with sync_playwright() as p:
        managed = p.chromium.executable_path
    # One install for all the test workers.
    with filelock.FileLock(os.path.join(tempfile.gettempdir(), "saejax-playwright-install.lock")):
        if not os.path.exists(managed):
            install = subprocess.run([sys.executable, "-m", "playwright", "install", "chromium"],
                                     capture_output=True, text=True, timeout=900)
            if install.returncode != 0 or not os.path.exists(managed):
                pytest.fail("the browser tests need Chromium and found none: neither a system one (`apt install "
                            "chromium`) nor Playwright's, whose install failed (`python -m playwright install "
                            f"--with-deps chromium`):\n{install.stderr[-2000:]}", pytrace=False)
    return managed
