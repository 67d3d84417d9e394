"""`prunetune export`: a pruned (or merged, sparse) model directory written in another format.

- `run`       the one entry (`ExportConfig`, `run_export`): source checked and loaded, the format's writer
              called inside a staged output, `export.json` written beside;
- `base`      what every format gets and returns (`ExportFormat` protocol, `ExportSource`, `Written`);
- `registry`  format name -> its module: a new format is one file here plus one registry line;
- one module per format (`compressed_tensors`, ...).
Reading an export back lives apart from the writers (`prunetune.exported`), so loading never imports them.
"""
