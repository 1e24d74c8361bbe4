"""Segment your own images: python predict.py --config CFG --weight CKPT \\
    --support a.jpg a_mask.png [--support b.jpg b_mask.png ...] --query q1.jpg [q2.jpg ...] --out DIR [KEY VALUE ...]

A video checkpoint (config dataset ytvis / synthetic_video) takes one --query: a folder of
frames or a video file; it writes <out>/<frame>_mask.png per frame, <out>/overlay.mp4 and
<out>/strip.png (frames with the prediction, mined BG and DO).

K is the number of --support pairs. Masks are 0/1 or 0/255 single-channel PNGs (255 in a
0/1 mask is ignored), or class-id / palette PNGs with --class-id C. Writes per query
<out>/<stem>_mask.png (0/1, the query's size), <out>/<stem>_overlay.jpg and, with --panels,
<out>/<stem>_panel.png (supports, query, prediction, mined BG and DO).
"""
from commands.predict import main
from util.cli import run

if __name__ == "__main__":
    run(main)
