"""The offline transfer benchmark: printed characters -> handwritten digits and faces."""
