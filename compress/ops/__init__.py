"""Pure tensor maths: no hooks, no prints, no module surgery."""
