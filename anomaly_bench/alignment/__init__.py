"""Image alignment applied before a method sees the images."""
