"""``python -m jaxyolo.testing.oracles --check``: import every oracle or fail."""

import sys

from jaxyolo.testing import oracles


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m jaxyolo.testing.oracles [--check]", file=sys.stderr)
        return 2
    found = oracles.versions()
    wrong = {k: (v, oracles.ORACLE_VERSIONS[k]) for k, v in found.items() if not v.startswith(oracles.ORACLE_VERSIONS[k])}
    if wrong:
        for name, (have, want) in wrong.items():
            print(f"oracle {name}: installed {have}, pinned {want}", file=sys.stderr)
        return 1
    oracles.yolov5_modules()
    oracles.ultralytics_modules()
    oracles.yolox_modules()
    oracles.yolov9_modules()
    print("oracles importable: " + ", ".join(f"{k}=={v}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
