"""Runs idsync from a Unity Catalog volume in a Databricks job task.

The binary is copied to local disk first (a volume is not meant for executables), run with the
task's parameters, and its exit code decides the task's result: anything but 0 fails the run, so
the job's failure notifications fire (idsync's own [notify] webhook says why).
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile


def main() -> int:
    source = os.environ.get("IDSYNC_BIN", "/Volumes/ops/idsync/files/idsync")
    local = os.path.join(tempfile.mkdtemp(prefix="idsync-"), "idsync")
    shutil.copyfile(source, local)
    os.chmod(local, stat.S_IRWXU)
    args = sys.argv[1:] or ["run", "--once"]
    # Progress goes to the driver's log as a plain line every 30 seconds.
    done = subprocess.run([local, "--progress-every", "30s", *args], check=False)
    return done.returncode


if __name__ == "__main__":
    code = main()
    if code != 0:
        raise SystemExit(f"idsync exited with code {code} (1 error, 3 halted, 4 another run holds the lease)")
