import sys

from jaxreg.weights import main

sys.exit(main())
