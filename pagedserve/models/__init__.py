"""Model families, one file each, and the registry that maps a checkpoint's architecture to one."""
