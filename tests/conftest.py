import jax

from saejax.datasets import synthetic


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
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    import filelock
    import pytest
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
