"""`python -m bnstudy.report` / `bnstudy-report`: a study's report (bnstudy.analysis.report)."""

from bnstudy.analysis.report import main

if __name__ == "__main__":
    main()
