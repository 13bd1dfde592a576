"""python -m tinyserve ...  (the same as the `tinyserve` console script)"""

from .cli import main

raise SystemExit(main())
