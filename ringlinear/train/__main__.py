"""`torchrun --nproc-per-node N -m ringlinear.train [train flags]`: `ringlinear train` in each process."""

from .cli import main

if __name__ == "__main__":
    main()
