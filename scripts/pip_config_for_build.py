"""Writes this host's pip configuration as one pip.conf for a container build, and prints the
local paths it names (wheel folders, file:// indexes, CA bundle, constraints) to mount there.

`pip config list` shows files and environment variables alike; pip ranks the environment above
files, and so does the written file. Usage: python3 scripts/pip_config_for_build.py OUT.conf
"""

import os
import subprocess
import sys


def main(out: str) -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    settings: dict[str, str] = {}
    for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[1]] = value.strip().strip("'\"")
    with open(out, "w") as conf:
        conf.write("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    paths = set()
    for word in (word for value in settings.values() for word in value.split()):
        if word.startswith("file:///"):
            # a local index's pages link beside it (…/simple/ next to …/files/): mount its parent
            paths.add(os.path.dirname(os.path.realpath(word.removeprefix("file://").rstrip("/"))))
        elif word.startswith("/"):
            paths.add(os.path.realpath(word))
    for path in sorted(p for p in paths if os.path.exists(p)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1])
