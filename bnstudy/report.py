"""`python -m bnstudy.report` / `bnstudy-report`: a study's report (bnstudy.analysis.cli)."""

from bnstudy.analysis.cli import main

if __name__ == "__main__":
    main()
