import sys

from diffusion_blend.cli import main

sys.exit(main())
