"""`python -m rcm`: the same command as the `rcm` script, from whichever interpreter runs it.

The workflow's jobs call `<the interpreter running Snakemake> -m rcm`, so they never depend on an
`rcm` being on PATH (nor pick up another installation's).
"""

import sys

from rcm.cli import main

sys.exit(main())
