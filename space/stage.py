"""Stage the Hugging Face Space: app.py, README.md (front matter), requirements.txt and the blossom package.

python space/stage.py OUT_DIR
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stage(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("app.py", "README.md", "requirements.txt"):
        shutil.copy2(HERE / name, out / name)
    shutil.copytree(
        HERE.parent / "src" / "blossom", out / "src" / "blossom", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return out


if __name__ == "__main__":
    print(stage(Path(sys.argv[1])))
