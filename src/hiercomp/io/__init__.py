"""Reading models in, writing compressed models out (atomically), and exporting them."""
