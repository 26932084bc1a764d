"""``python -m results.build``: the results builder, run from the folder it writes.

The same command as ``python -m cwac.reports.build`` (the builder lives in the package so that its
tests import it like any other module); see that module for the options and what it writes.
"""

from cwac.reports.build import main

if __name__ == "__main__":
    raise SystemExit(main())
