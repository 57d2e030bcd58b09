cd /work/main && . /work/venv/bin/activate && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
T="target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]"
run() {  # name method adapter lr seed
  python -m orthotune finetune --config recipes/dit_digits.yaml --quiet --device cpu --output-dir /tmp/rr/$1 --seed $5 --lr $4 \
    --set model.checkpoint=pretrained:dit-fmnist-small --set method=$2 --set "adapter=$3" --set train.save_every=0 --set train.eval_every=0 > /tmp/rr/$1.log 2>&1
  python3 -c "import json; r=json.load(open('/tmp/rr/$1/results.json')); print('$1', r['final'], r['parameters']['trainable'])"
}
run dit-loco-k1r10 loco "{$T, rank: 10, chain_length: 1, mode: exact}" 2.7e-2 0
run dit-loco-k5r2 loco "{$T, rank: 2, chain_length: 5, mode: exact}" 2.7e-2 0
run dit-loco-lr081 loco "{$T, rank: 5, chain_length: 2, mode: exact}" 8.1e-2 0
python benchmarks/loco_magnitude.py --config recipes/dit_digits.yaml --lr 2.7e-2 --seeds 0 1 2 --out /tmp/rr/magnitude.json --set model.checkpoint=pretrained:dit-fmnist-small --set method=loco --set "adapter={$T, rank: 5, chain_length: 2, mode: exact}" 2>&1 | grep seed
