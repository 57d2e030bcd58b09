# The runs of why/ (2 CPU cores), in the order they ran (rotation_reach.py's magnitude variant was loco_magnitude.py then).
cd /work/main && . /work/venv/bin/activate && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
T="target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]"
run() {  # name recipe backbone method adapter lr seed
  python -m orthotune finetune --config recipes/$2.yaml --quiet --device cpu --output-dir /tmp/rr/$1 --seed $7 --lr $6 \
    --set model.checkpoint=pretrained:$3 --set method=$4 --set "adapter=$5" --set train.save_every=0 --set train.eval_every=0 > /tmp/rr/$1.log 2>&1
  python3 -c "import json; r=json.load(open('/tmp/rr/$1/results.json')); print('$1', r['final'], r['parameters']['trainable'])"
}
D="dit_digits dit-fmnist-small" V="vit_digits vit-fmnist-small"
LORA="{$T, r: 8, lora_alpha: 16}" LOCO="{$T, rank: 5, chain_length: 2, mode: exact}"
run dit-lora $D lora "$LORA" 1.8e-2 0; run dit-loco $D loco "$LOCO" 2.7e-2 0; run dit-full $D full "{}" 8.1e-3 0
run vit-lora $V lora "$LORA" 6e-3 0; run vit-full $V full "{}" 2.7e-3 0; run vit-loco $V loco "$LOCO" 2.7e-2 0
python benchmarks/rotation_residual.py /tmp/rr/dit-lora /tmp/rr/dit-full /tmp/rr/dit-loco /tmp/rr/vit-lora /tmp/rr/vit-full \
  /tmp/rr/vit-loco --out benchmarks/results/dit_cpu_grids/why/residual.json
for s in 0 1 2; do
  run dit-loco-fl-$s $D loco "{$T, rank: 5, chain_length: 2, mode: exact, modules_to_save: [y_embedder, final_linear]}" 2.7e-2 $s
  run dit-lora-fl-$s $D lora "{$T, r: 8, lora_alpha: 16, modules_to_save: [y_embedder, final_linear]}" 1.8e-2 $s
done
for s in 1 2; do run dit-loco-$s $D loco "$LOCO" 2.7e-2 $s; run dit-lora-$s $D lora "$LORA" 1.8e-2 $s; done
run dit-loco-k1r10 $D loco "{$T, rank: 10, chain_length: 1, mode: exact}" 2.7e-2 0
run dit-loco-k5r2 $D loco "{$T, rank: 2, chain_length: 5, mode: exact}" 2.7e-2 0
run dit-loco-lr081 $D loco "$LOCO" 8.1e-2 0
python benchmarks/rotation_reach.py --variant magnitude --config recipes/dit_digits.yaml --lr 2.7e-2 --seeds 0 1 2 --out benchmarks/results/dit_cpu_grids/why/magnitude.json \
  --set model.checkpoint=pretrained:dit-fmnist-small --set method=loco --set "adapter=$LOCO"
# the full input-side rotation (LOFT's full support with a Cayley transform: OFT with one d x d block), seed 0
for lr in 2e-3 6e-3 1.8e-2; do run dit-fullrot-$lr $D loft "{$T, support: full, transform: cayley}" $lr 0; done
# the same on the CPU-sized ViT, for contrast
V="vit_digits vit-fmnist-small"
for lr in 2e-3 6e-3 1.8e-2; do run vit-fullrot-$lr $V loft "{$T, support: full, transform: cayley}" $lr 0; done
# either side of the layer, one harness (benchmarks/rotation_reach.py); records in side_rotation.json (written by that script's first version, side_rotation.py)
for lr in 2e-3 6e-3 1.8e-2; do python benchmarks/rotation_reach.py --variant output --config recipes/dit_digits.yaml --lr $lr --seeds 0 \
  --set model.checkpoint=pretrained:dit-fmnist-small; done
for side in output input; do python benchmarks/rotation_reach.py --variant $side --config recipes/dit_digits.yaml --lr 6e-3 --seeds 1 2 \
  --set model.checkpoint=pretrained:dit-fmnist-small; done
python benchmarks/rotation_reach.py --variant input --config recipes/dit_digits.yaml --lr 6e-3 --seeds 0 --set model.checkpoint=pretrained:dit-fmnist-small
# LoCO's chain on the output side at LoRA's budget (k2 r4), seed 0
for lr in 9e-3 2.7e-2 8.1e-2; do python benchmarks/rotation_reach.py --variant loco-output --rank 4 --chain 2 --config recipes/dit_digits.yaml \
  --lr $lr --seeds 0 --set model.checkpoint=pretrained:dit-fmnist-small; done
