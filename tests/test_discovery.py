"""Method discovery: every module of gren/methods registers itself, and installed plugins register through
the ``gren.methods`` entry-point group and then appear in every ``gren`` command."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import gren.methods
from gren.methods import METHODS
from gren.methods.registry import _NOT_METHODS

PLUGIN = '''
"""A user's own method: CAM under another name, with a smaller transition layer by default."""
from gren.methods.cam import WangCAM


class PluginCam(WangCAM):
    """A plugin method (test)."""

    defaults = {"cam": {"channels": 16}}
'''


def test_every_method_module_registers_itself():
    modules = {info.name for info in pkgutil.iter_modules(gren.methods.__path__)} - _NOT_METHODS
    registered_from = {cls.__module__.rsplit(".", 1)[-1] for cls in METHODS.values()}
    assert modules <= registered_from, f"modules that register nothing: {modules - registered_from}"


def _install_fake_plugin(root, entry: str) -> dict:
    """A package ``gren_test_plugin`` and a dist-info declaring ``entry`` in the gren.methods group."""
    (root / "gren_test_plugin").mkdir()
    (root / "gren_test_plugin" / "__init__.py").write_text(PLUGIN)
    (root / "gren_test_plugin" / "broken.py").write_text("raise ImportError('this plugin is broken')\n")
    info = root / "gren_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gren-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [gren.methods]
        {entry}
        broken-plugin = gren_test_plugin.broken
        """))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}


def test_an_entry_point_method_appears_in_the_cli(tmp_path):
    env = _install_fake_plugin(tmp_path, "plugin-cam = gren_test_plugin:PluginCam")
    listed = subprocess.run([sys.executable, "-m", "gren.cli", "methods", "--json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["plugin-cam"]["module"] == "gren_test_plugin"
    assert rows["plugin-cam"]["defaults"]["cam"]["channels"] == 16
    assert "broken-plugin" in listed.stderr and "this plugin is broken" in listed.stderr  # a warning, not a crash
    # the plugin's config sections are valid keys and its name is a known method for train / crossval
    code = ("from gren.train.config import resolve_config; "
            "c = resolve_config(None, ['cam.channels=8'], method='plugin-cam'); print(c['cam']['channels'])")
    resolved = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0 and resolved.stdout.strip() == "8", resolved.stderr
    missing = subprocess.run([sys.executable, "-m", "gren.cli", "train", "--data", str(tmp_path / "none"),
                              "--method", "plugin-cam", "--out", str(tmp_path / "run")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "unknown method" not in missing.stderr and "no such data" in missing.stderr


def test_without_the_plugin_the_method_is_unknown(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gren.cli", "train", "--data", str(tmp_path), "--method",
                           "plugin-cam", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown method 'plugin-cam'" in done.stderr
