"""Fine-grained image retrieval: open_clip encoders fine-tuned with Circle Loss. This package is the model side.

Data flows one way through the project; `retrieval` holds the first stages and what measures them:

    files -> decode -> encode -> LMDB -> FAISS -> search -> query / eval / serve

    data/            files: readers (cub, cars, sop, folder), walk.py, the generated set; decode.py, sampler.py
    encoder/         encode: open_clip tower + head, its preprocessing, run directories, fingerprint
    embed.py         batched embedding; losses.py and finetune.py train the encoder
    metrics.py       exact kNN and the one ranking + metrics path (finetune, eval --dataset, eval --db)
    eval_dataset.py  eval --dataset; report.py writes every report

LMDB, FAISS and search live in `indexer`, which builds on this package; `retrieval` never imports `indexer`
(tests/test_layers.py checks every module).
"""

__version__ = "0.1.0"
