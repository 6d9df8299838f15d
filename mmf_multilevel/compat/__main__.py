import sys

from mmf_multilevel.compat.doctor import main

sys.exit(main())
