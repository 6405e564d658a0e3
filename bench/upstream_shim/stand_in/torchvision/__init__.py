"""A stand-in for the few torchvision transforms diffusers' DreamBooth example scripts use, so the
bench can run upstream's unmodified scripts beside ours in an environment without torchvision
(PyPI's torchvision does not import beside this torch). PIL and torch only; on the bench's path
for upstream runs alone, never for the toolkit."""
