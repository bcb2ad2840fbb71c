"""Child Pythons for the tests that need a fresh process (ISA choice, Ctrl-C, crashes).

A child must import the same moe as the test process, wherever pytest was started: with a
non-editable install, `python -c` run from the source tree would put the working directory
first on sys.path and import the unbuilt moe/ there.  So children get PYTHONSAFEPATH=1
(Python >= 3.11 then adds no such entry) and, for older Pythons too, a working directory
of their own unless the test names one; PYTHONPATH leads to the tested moe.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import moe

_OWN_CWD = tempfile.mkdtemp(prefix="moe-child-")
atexit.register(shutil.rmtree, _OWN_CWD, True)


def child_env(**extra):
    """os.environ for a child Python that imports this moe; extra=None removes a variable."""
    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(moe.__file__)), os.environ.get("PYTHONPATH", "")]))
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def python(code, *args, env=None, cwd=None, popen=False, timeout=120, **kw):
    """Run `python -c code *args` as a child that imports this moe: a CompletedProcess
    (output captured as text), or with popen=True a started Popen with pipes."""
    argv = [sys.executable, "-c", code, *map(str, args)]
    env = child_env() if env is None else env
    if popen:
        return subprocess.Popen(argv, env=env, cwd=cwd or _OWN_CWD, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(argv, env=env, cwd=cwd or _OWN_CWD, capture_output=True, text=True,
                          timeout=timeout, **kw)
