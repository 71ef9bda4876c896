"""Run the trainer tests and print a closing 'N passed, N failed' line.

    python3 -m trainer.tests.run_all
"""

import sys
import unittest


def main() -> int:
    suite = unittest.defaultTestLoader.discover("trainer/tests", pattern="test_*.py",
                                                top_level_dir=".")
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    passed = result.testsRun - failed - len(result.skipped)
    print(f"{passed} passed, {failed} failed, {len(result.skipped)} skipped")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
