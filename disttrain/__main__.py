import sys

from disttrain.cli import main

sys.exit(main())
