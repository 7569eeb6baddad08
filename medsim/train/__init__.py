"""Fine-tuning the VGG-16 embedding on labeled chest radiographs (`medsim train`)."""
