"""The built-in CNN on a folder of PNG files, read with Pillow and augmented per sample in DataLoader workers."""
