"""Distribution families: what a bootable tree of each needs and how to build it."""
