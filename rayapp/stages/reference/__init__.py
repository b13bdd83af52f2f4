"""Stage 2, reference: fine-tune the small model for N epochs, exporting a checkpoint per epoch."""
