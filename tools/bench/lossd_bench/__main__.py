import sys

from .service_bench import main

if __name__ == "__main__":
    sys.exit(main())
