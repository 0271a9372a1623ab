"""What every stage shares and none owns: atomic writes (nothing half-written is ever left behind) and the optional
extras' import with a message naming the package to install."""
