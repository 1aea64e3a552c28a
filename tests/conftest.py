import sys
from pathlib import Path

# Test helpers live beside the tests (tests/helpers.py), not in the package.
sys.path.insert(0, str(Path(__file__).parent))
