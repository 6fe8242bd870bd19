"""`python -m bnstudy.study` / `bnstudy-study`: a study trained until nothing is pending, then its report
(bnstudy.app.study_runner). Each round's training runs in its own `python -m bnstudy.train` process.

python -m bnstudy.study placement                  # the full study: plan, extensions, seed rounds, report
python -m bnstudy.study placement +preset=quick    # its quick variant
"""

from bnstudy.app.study_runner import main

if __name__ == "__main__":
    main()
