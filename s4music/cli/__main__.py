"""`python -m s4music.cli`: the same CLI, for launchers that take a module (torchrun -m, accelerate launch -m)."""

from s4music.cli.app import main

main()
