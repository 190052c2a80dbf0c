"""virt-forward: forward host ports to libvirt guests, following each guest's life."""

__version__ = "0.1.0"
