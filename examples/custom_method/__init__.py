"""A method of one's own beside the four built-in ones: a median filter in front of the clean classifier."""
