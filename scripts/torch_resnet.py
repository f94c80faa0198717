"""The CIFAR (SE-)ResNets of senet-wgpu (src/model/resnet.rs) in PyTorch, with the same state_dict
names: He et al.'s 6n+2 networks with projection shortcuts (1x1 conv + BN) where the shape changes
and, for SE-ResNets, an SE block on the residual branch before the addition (Hu et al., Fig. 3).
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
