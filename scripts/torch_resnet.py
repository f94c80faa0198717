"""The (SE-)ResNets of senet-wgpu (src/model/resnet.rs) in PyTorch, with the same state_dict names
(torchvision's): He et al.'s CIFAR 6n+2 networks and ImageNet ResNet-18/34/50/101/152, with
projection shortcuts (1x1 conv + BN) where the shape changes and, for SE-ResNets, an SE block on
the residual branch before the addition (Hu et al., Fig. 3). Bottlenecks stride in their first
1x1 convolution, as the original ResNet and the SENet paper's models (torchvision's ResNet-50
"v1.5" strides in the 3x3: same names and shapes, different function).
"""
import torch.nn as nn


class SE(nn.Module):
    def __init__(self, c, reduction=16, bias=False):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // reduction, 1, bias=bias)
        self.fc2 = nn.Conv2d(c // reduction, c, 1, bias=bias)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.fc2(self.fc1(s).relu()).sigmoid()


class BasicBlock(nn.Module):
    def __init__(self, c_in, c, stride, se, reduction, se_bias):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = SE(c, reduction, se_bias) if se else None
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        if self.se is not None:
            y = self.se(y)
        return (y + (x if self.downsample is None else self.downsample(x))).relu()


class Bottleneck(nn.Module):
    # groups: the 3x3's channel groups (ResNeXt's cardinality; 1 = ResNet), weight [w, w/groups, 3, 3].
    def __init__(self, c_in, w, c_out, stride, se, reduction, se_bias, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, w, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.se = SE(c_out, reduction, se_bias) if se else None
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn3(self.conv3(self.bn2(self.conv2(y)).relu()))
        if self.se is not None:
            y = self.se(y)
        return (y + (x if self.downsample is None else self.downsample(x))).relu()


IMAGENET = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
            101: (True, [3, 4, 23, 3]), 152: (True, [3, 8, 36, 3])}


class ImageNetResNet(nn.Module):
    def __init__(self, depth, se=False, num_classes=1000, in_channels=3, width=1.0, reduction=16, se_bias=False,
                 groups=1):
        super().__init__()
        bottleneck, blocks = IMAGENET[depth]
        expansion = 4 if bottleneck else 1
        widths = [int(c * width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for s, (w, n) in enumerate(zip(widths, blocks)):
            layer = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                if bottleneck:
                    layer.append(Bottleneck(c_in, w, w * expansion, stride, se, reduction, se_bias, groups))
                else:
                    layer.append(BasicBlock(c_in, w, stride, se, reduction, se_bias))
                c_in = w * expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)).relu())
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def resnet(name, num_classes, in_channels, width=1.0, reduction=16, se_bias=False):
    """`resnet20`, `se-resnet50`, … as senet-wgpu names them."""
    se = name.startswith("se-")
    depth = int(name.removeprefix("se-").removeprefix("resnet"))
    cls = ImageNetResNet if depth in IMAGENET else CifarResNet
    return cls(depth, se, num_classes, in_channels, width, reduction, se_bias)


class CifarResNet(nn.Module):
    def __init__(self, depth, se=False, num_classes=10, in_channels=3, width=1.0, reduction=16, se_bias=False):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        widths = [int(c * width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for s, c in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if s > 0 and b == 0 else 1, se, reduction, se_bias))
                c_in = c
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))
