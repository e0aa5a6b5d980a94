"""`make` runs this after installing the library into its environment. The platform (cli/, tasks/, flows/,
deployments/) runs from this checkout, as its Prefect deployments do, so the wheel installs only `soups`; here
the environment gets the checkout on its path (a .pth file) and the `soups` command."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
LAUNCHER = '''#!{python}
"""The platform's command, run from the checkout {checkout} (written by scripts/install_checkout.py)."""
import sys

from cli.main import main

sys.exit(main())
'''


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    (site / "model_soups_checkout.pth").write_text(f"{CHECKOUT}\n")
    command = Path(sys.executable).with_name("soups")  # the environment's bin/, not the resolved interpreter's
    command.write_text(LAUNCHER.format(python=sys.executable, checkout=CHECKOUT))
    command.chmod(0o755)
    print(f"soups: the platform runs from {CHECKOUT}; command {command}")


if __name__ == "__main__":
    main()
