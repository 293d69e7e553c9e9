"""`python -m resnet_bk fit --config configs/quickstart.yaml`: the same CLI as the `lightning` script."""

import sys

from resnet_bk.cli import main

sys.argv[0] = "python -m resnet_bk"  # the name that usage and help messages show
sys.exit(main())
