"""The integer program: its in-memory form (``program``), the file format (``format``), the fixed-point
helpers of export (``fixedpoint``) and the post-softmax quantizers (``quantizers``)."""
