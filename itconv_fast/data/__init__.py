"""Data sets of the paper: Digitclutter (generated), MNIST, CIFAR-10 and CIFAR-100 (standard files)."""
