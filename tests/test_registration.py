"""`awd` is found by plain mergekit, and installing the plugin costs nothing at start-up."""

import subprocess
import sys


def run(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300)


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    proc = run("pass", "-X", "importtime")
    modules = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "_mergekit_awd_hook" in modules  # the hook is installed...
    loaded = [m for m in modules if m.split(".")[0] in ("torch", "mergekit", "mergekit_awd", "numpy")]
    assert loaded == []  # ...and imports nothing heavy


def test_mergekit_registry_finds_awd_without_importing_the_plugin():
    proc = run("import sys; from mergekit.merge_methods import get; m = get('awd'); "
               "print(m.spec.name, type(m).__module__, 'mergekit_awd' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["awd", "mergekit_awd.method", "True"]


def test_import_plugin_registers_once_in_either_order():
    proc = run("import mergekit_awd, mergekit.merge_methods as m; import mergekit_awd.registration as r; "
               "r.register_all(); print(sum(x.spec.name == 'awd' for x in m.registered_methods()))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
