"""The Space's entry point: blossom's web app, with the package shipped beside it in src/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))

from blossom.webapp import main  # noqa: E402

main()
